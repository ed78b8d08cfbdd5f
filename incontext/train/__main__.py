from incontext.train.cli import main

main()
