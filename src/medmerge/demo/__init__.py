"""The offline demo: SmolLM2-135M-Instruct (shipped as GGUF on PyPI) and ICD-10-CM data.

Work in progress (issue 9): the GGUF conversion and the ICD-10 data builders are here and
tested; the fine-tuning of the two specialists and the demo study come next.
"""
