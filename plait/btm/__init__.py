"""Branch-Train-Merge (Li et al. 2022): domain experts branched from one seed checkpoint, each
trained as an ordinary plait run with no communication between them, then merged by parameter
averaging or used as an ensemble. A mode built on the training loop: workflow.py branches,
trains (through the same Trainer as `plait train`), merges and evaluates the experts; cli.py is
the `plait btm branch|train|merge|eval` command line."""
