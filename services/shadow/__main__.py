from services.shadow.server import main

main()
