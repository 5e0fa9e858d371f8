"""Where the probe meets training code.

* :mod:`.distributed`: the probe under FSDP2 (``fully_shard``) and DDP, the Gram split over
  the ranks and summed by one all-reduce.

Nothing heavy is imported here.
"""
