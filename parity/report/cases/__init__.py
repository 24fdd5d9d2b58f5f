"""The report's cases by area: the block, the language model, training (registered cases)
and a Hugging Face folder's three-way check."""
