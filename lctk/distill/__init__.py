"""Distillation of a transformer into a hybrid, Apriel-H1 style: attention layers are replaced stage by stage by
recurrent mixers initialised from their attention weights, and distilled from the teacher.

Public surface:
    load_teacher(spec)                              teacher.py    HF folder / .gguf / package:MODULE -> (model, tokenizer)
    student_from_teacher, replace_layers, layout    convert.py    conversion and MIL initialisation
    leave_one_out, mmr_probes, ranking              importance.py which layer to replace next
    distill_loss_fn, token_kl                       losses.py     the KD loss the Trainer optimises
    quality, speed, cache_bytes, write_report       evidence.py   what each stage is measured by
    distill_recipe                                  run.py        the staged schedule (`lctk distill`)
"""
