from mixspec.fast import main

main()
