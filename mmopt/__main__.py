"""``python -m mmopt``: what ``accelerate launch -m mmopt ...`` and ``--processes`` start in each process."""
from mmopt.cli import main

if __name__ == "__main__":      # importing the module (the architecture test does) runs nothing
    main()
