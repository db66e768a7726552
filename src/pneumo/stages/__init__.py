"""One module per DVC stage, in dvc.yaml's order: validate, fetch, preprocess, train,
evaluate, compare, register, readme. Each takes its paths and params from the CLI and writes its
outputs atomically (:mod:`pneumo.files`)."""
