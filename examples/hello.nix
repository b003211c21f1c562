# The smallest derivation Nix builds without nixpkgs: the quick start's first attested build.
derivation {
  name = "hash-collection-hello";
  system = builtins.currentSystem;
  builder = "/bin/sh";
  args = [ "-c" "echo 'hello from nix-hash-collection' > $out" ];
}
