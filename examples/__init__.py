"""Example models for loopify: the zoo (``loopify.examples.zoo``) and a nanoGPT-style GPT."""
