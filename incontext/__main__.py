from incontext.cli import main

main()
