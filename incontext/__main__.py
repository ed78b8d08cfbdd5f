from incontext.cli import main

if __name__ == "__main__":  # the engine process (multiprocessing spawn) imports this module too
    main()
