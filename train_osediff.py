"""One-step (OSEDiff) training: `accelerate launch train_osediff.py --config configs/osediff.yaml [key=value]`."""

from seesr.osediff_train import main

if __name__ == "__main__":
    main()
