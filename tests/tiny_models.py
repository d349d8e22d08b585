"""Tiny randomly initialised MoE models of every supported architecture, built offline."""

from __future__ import annotations

from pathlib import Path

WORDS = ("def return import class for while if else the of and to in is that poem moon river "
         "wind 山 月 水 风 der die und le la et integral sum").split()


def tiny_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["[UNK]", "[PAD]"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([" ".join(WORDS)] * 20, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


COMMON = dict(vocab_size=320, hidden_size=32, intermediate_size=32, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              pad_token_id=1, bos_token_id=None, eos_token_id=None)

CONFIGS = {
    "mixtral": ("mixtral", dict(num_local_experts=4, num_experts_per_tok=2)),
    "qwen2-moe": ("qwen2_moe", dict(num_experts=6, num_experts_per_tok=2, moe_intermediate_size=16,
                                    shared_expert_intermediate_size=16, norm_topk_prob=False)),
    "qwen3-moe": ("qwen3_moe", dict(num_experts=6, num_experts_per_tok=3, moe_intermediate_size=16,
                                    norm_topk_prob=True)),
    "olmoe": ("olmoe", dict(num_experts=8, num_experts_per_tok=2)),
    "deepseek-v2": ("deepseek_v2", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                        n_group=4, topk_group=2, topk_method="group_limited_greedy",
                                        first_k_dense_replace=0, kv_lora_rank=16, q_lora_rank=None,
                                        qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                        n_shared_experts=1, num_key_value_heads=4)),
    "deepseek-v3": ("deepseek_v3", dict(n_routed_experts=8, num_experts_per_tok=2, moe_intermediate_size=16,
                                        n_group=4, topk_group=2, first_k_dense_replace=0, kv_lora_rank=16,
                                        q_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8,
                                        n_shared_experts=1, num_key_value_heads=4)),
    "gpt-oss": ("gpt_oss", dict(num_local_experts=4, num_experts_per_tok=2, head_dim=8)),
    "phimoe": ("phimoe", dict(num_local_experts=4, num_experts_per_tok=2)),
}


def build(name: str, folder: Path, seed: int = 0):
    """Save a tiny model of architecture ``name`` (and a tokenizer) to ``folder``; return it."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    if name == "switch":
        from transformers import SwitchTransformersConfig, SwitchTransformersForConditionalGeneration

        cfg = SwitchTransformersConfig(vocab_size=320, d_model=32, d_kv=8, d_ff=32, num_layers=2,
                                       num_decoder_layers=2, num_heads=4, num_experts=4,
                                       num_sparse_encoder_layers=2, num_sparse_decoder_layers=1,
                                       expert_capacity=1000, pad_token_id=1, decoder_start_token_id=1)
        model = SwitchTransformersForConditionalGeneration(cfg)
    else:
        model_type, extra = CONFIGS[name]
        cfg = AutoConfig.for_model(model_type, **{**COMMON, **extra})
        model = AutoModelForCausalLM.from_config(cfg)
        if model_type == "deepseek_v3":  # a non-zero correction bias, so it matters
            for mod in model.modules():
                if hasattr(mod, "e_score_correction_bias"):
                    mod.e_score_correction_bias.copy_(torch.randn_like(mod.e_score_correction_bias))
    model.eval()
    folder.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(folder)
    tiny_tokenizer().save_pretrained(folder)
    return model


ALL = list(CONFIGS) + ["switch"]
