"""One-step (OSEDiff) training: `accelerate launch train_osediff.py --config configs/osediff.yaml [key=value]`."""

from seesr.training.osediff import main

if __name__ == "__main__":
    main()
