from mixspec.cli import main

main()
