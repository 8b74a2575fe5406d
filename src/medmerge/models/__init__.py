"""What a merge knows about models, independent of any file: the tensor layouts of each
architecture (`architectures`: layers, embeddings, heads, attention heads, experts) and the
named chat templates (`chat_templates`)."""
