"""`python -m ota_client`: the same as `otactl`."""

from ota_client.cli import app

app(prog_name="otactl")
