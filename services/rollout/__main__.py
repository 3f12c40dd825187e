from services.rollout.server import main

main()
