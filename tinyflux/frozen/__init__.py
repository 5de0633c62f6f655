"""The frozen models: the zoo of encoders, VAE and teachers (where they come from, how their features are taken), Sol's statistics and the teacher files."""
