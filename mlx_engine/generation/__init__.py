"""Generation: the loop (tokens, logprobs, captures), text (detokenizing, stop strings),
the Harmony channel parser, and the public API (create_generator[_with_activations],
run_with_cache)."""
