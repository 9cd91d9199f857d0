"""What a person reads of a run: the lines printed (text), progress bars and lines
(progress), metrics.jsonl and VisualDL (logger), and the plots (plots)."""
