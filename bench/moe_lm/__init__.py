"""A small MoE language model whose routing is learned, trained on offline text, for evaluating route predictors.

Map of the folder (run every module from the repository root as ``python -m bench.moe_lm.<module>``):
- ``corpus``: CPU machine only: real text from this machine -> byte-level BPE -> ``.moe_lm/`` token ids.
- ``data``: the corpus on disk, its split by document, training windows and held-out sequences.
- ``model``: ``MoeLM`` (8 layers x 32 experts, top-4, a linear router per layer) and ``ModelConfig``.
- ``train``: seeded training for a step count or a wall budget; saves a checkpoint.
- ``record``: runs the trained model over held-out text and writes ``RouteTrace`` files and router gates.
- ``evaluate``: every predictor side by side on the recorded trace, held out by sequence.
- ``run_gpu.sh``: train -> record -> evaluate in one command on the GPU machine.
"""
