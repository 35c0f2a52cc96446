"""A handler module that fails as it is imported, in words that name another flag: the loader's message
quotes them as they are (`--handler loud_import:H`, in each front end's spelling of the setting)."""

raise ValueError("give --model a folder")
