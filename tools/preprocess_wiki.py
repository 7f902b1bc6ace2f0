#!/usr/bin/env python
"""Wikipedia dump -> Megatron IndexedDataset passages + span-candidate shards (= ``megatron-pz preprocess``)."""

import sys

from megatron_pz.data.preprocess import main

if __name__ == "__main__":
    sys.exit(main())
