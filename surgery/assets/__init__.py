"""The embedded tiny models, their tokenizers and the Python license text (the article's data); see README.md here."""
