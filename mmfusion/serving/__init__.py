"""The web demo (`mmfusion serve`): a Gradio page over a request service that batches the model's work."""
