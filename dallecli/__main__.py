from dallecli.cli import main

main()
