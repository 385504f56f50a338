"""Train TGSR: `accelerate launch train_tgsr.py --config configs/tgsr.yaml [key=value ...]`."""

import sys

from seesr.data.tgsr_prepare import check_training_data

if __name__ == "__main__":
    check_training_data(sys.argv[1:])  # fails at once, with the command to run, when the data is missing
    from seesr.training.tgsr import main

    main()
