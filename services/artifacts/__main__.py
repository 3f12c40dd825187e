from services.artifacts.server import main

main()
