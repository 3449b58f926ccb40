"""The features protocol: radiomics settings every site resolves the same way, and the server's check of the
sites' counts and settings hashes (feature tables never leave a site)."""
