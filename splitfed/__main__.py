from splitfed.cli import main

main()
