from services.gateway.gateway import main

main()
