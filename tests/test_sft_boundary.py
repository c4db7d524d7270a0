"""The prompt/completion boundary on the embedded model's own tokenizer (issue 21, against TRL's SFTTrainer).

TRL tokenizes prompt + completion as one text and starts the loss where its ids part from the prompt's
own; where BPE merges across the boundary (a prompt ending in a space, or in a word the completion
continues) that trains on a context the model is never asked in. lorakit tokenizes the two apart, so the
ids it trains after are the ids ``prompt_ids`` gives generation, and the completion ends in EOS.
"""

from __future__ import annotations

import pytest

from lorakit.train import data, models

# (prompt, completion) whose joined text the tokenizer splits differently at the boundary.
MERGING = [("Classify the sentiment (positive/negative): The pizza was great! ", "positive"),
           ("Capitalise this name properly: LUCAS ALI", "Lucas Ali")]


@pytest.mark.slow
def test_training_continues_the_prompt_as_generation_is_given_it():
    from transformers import AutoTokenizer

    smol = AutoTokenizer.from_pretrained(models.model_dir())
    for prompt, completion in MERGING:
        joined = smol(prompt + completion, add_special_tokens=False)["input_ids"]
        asked = data.prompt_ids(prompt, smol)
        assert joined[:len(asked)] != asked  # the case in point: joining merges across the boundary
        example = data.tokenize([{"prompt": prompt, "completion": completion}], smol, 64, "raw").examples[0]
        assert example["input_ids"][:len(asked)] == asked
        assert example["labels"] == [data.IGNORE] * len(asked) + example["input_ids"][len(asked):]
        assert smol.decode(example["input_ids"][len(asked):]) == completion + smol.eos_token
