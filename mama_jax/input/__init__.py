"""The input side: captions, the tokenizer, the Grain pipeline, augmentation, the study
index and the class-balanced sampler. It knows no model: records in, arrays out."""
