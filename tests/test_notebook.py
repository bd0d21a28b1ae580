"""What a notebook user meets first: what `import sparcom_jax` pulls in, warnings on the
first calls, and how the main result objects display."""

from __future__ import annotations

import warnings

import sparcom_jax as sj


def test_loading_and_saving_a_model_use_no_deprecated_flax_api(hf_checkpoint, tmp_path):
    # flax 0.12 deprecated Variable.value (read and write); it warned once per tensor and will go away.
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = sj.load_model(hf_checkpoint("llama"), with_tokenizer=False)
        saved = sj.save_model(model, tmp_path / "m")
    deprecated = [str(w.message).splitlines()[0] for w in caught if issubclass(w.category, DeprecationWarning)]
    assert deprecated == []
    assert (saved / "model.safetensors").is_file()
