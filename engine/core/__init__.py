"""The core every layer may import: adapter files, data, config, errors, loss maths, device, hashing, the Hub.

Nothing here imports a stage (scoring, selection, merge, finetune, report) or `actors/`."""
