"""The merge engine: what mergekit 0.1.5 does, in memory.

It turns a recipe (mergekit's YAML schema, typed) into tensors, a live model or
an HF folder on disk, and guarantees:

- bit-exact with mergekit 0.1.5: the same tensor names, shapes, dtypes and bytes
  that `mergekit-yaml` / `mergekit-moe` / `mergekit-multi` write (the tests in
  tests/test_*_vs_mergekit.py compare them);
- in memory: sources load once and stay resident, a candidate is written into the
  preallocated parameters of a resident model, never through disk;
- aliasing: a tensor a recipe takes unchanged points at its source instead of
  being copied, so a candidate costs one pass over the tensors it really merges.

Where to start reading: recipe.py (the schema) -> plan.py (which tensors each
output tensor is made of) -> materialize.py (running the plan) -> methods/ (the
math, one small function per method) and moe.py (Mixtral assembly); output.py
and merge_command.py write a recipe's result to disk (`mergesearch merge`).
Vocabularies that differ (`tokenizer_source`, `tokenizer:`): stage_tokenizers.py, then
vocabulary.py (the output tokenizer) and vocabulary_rows.py (the re-indexed embeddings).
A recipe's `chat_template:`: chat_template.py (the template), set on the tokenizer by stage_tokenizers.py.
LoRA adapters (`model+adapter`): lora.py (what an adapter changes) and lora_merge.py (the math).

Import rule (tests/test_layout.py): the engine imports nothing from the rest of
`search`, nor from `spaces` or `objectives`; everything else may import it.
"""
