"""Built-in catalog: real published ``config.json`` files, addressable by model id."""
