"""scpl-kit: decoupled (local-loss) training such as SCPL, compared against backpropagation.

The three ideas are kept apart on purpose:
  models  - a network as K blocks plus a predictor
  methods - what loss each block learns from and what is detached (turns a model into local units)
  engines - where units run and how batches flow between them
"""

__version__ = "0.1.0"
