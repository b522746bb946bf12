from insertcoin.cli import main

main()
