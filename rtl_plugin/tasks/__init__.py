"""Task pipelines (data builders, runners, task metrics). They import the core; the core never imports them."""
