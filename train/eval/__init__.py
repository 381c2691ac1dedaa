"""Evaluation harness: MMLU, GSM8K and HumanEval against any `lm.LanguageModel`."""
