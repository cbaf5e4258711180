from lpengine.cli import main

main()
