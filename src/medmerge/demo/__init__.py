"""The offline demo: SmolLM2-135M-Instruct (shipped as GGUF on PyPI) converted, two ICD-10-CM
specialists fine-tuned from it on the CPU, merged by every method, evaluated and reported
(`run`); and `medmerge example` (`example`)."""
