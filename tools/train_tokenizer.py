#!/usr/bin/env python
"""Train a byte-level BPE tokenizer on a dump's cleaned articles (= ``megatron-pz train-tokenizer``)."""

import sys

from megatron_pz.data.train_tokenizer import main

if __name__ == "__main__":
    sys.exit(main())
