"""Task losses and evaluation metrics: retrieval (ITC + ITM), VQA, captioning."""
