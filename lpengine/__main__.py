from lpengine.cli import main

# Guarded: worker processes (analysis) re-import the main module under another name, as multiprocessing does.
if __name__ == "__main__":
    main()
