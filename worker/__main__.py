from worker.cli import main

if __name__ == "__main__":  # (not in a spawned finishing process, which imports this module too)
    main()
