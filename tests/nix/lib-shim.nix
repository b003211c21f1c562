# The smallest stand-in for nixpkgs' `lib` that module.nix needs, for the
# structural check in tests/test_nixos_module.py. It is NOT nixpkgs' lib:
# mkIf and mkMerge only build markers that module-harness.nix resolves, and
# each type only knows how to check a value and describe itself.
#
# Where the tests look, it behaves as nixpkgs' lib/strings.nix and lib/types.nix
# do (descriptions, what each type accepts, escapeShellArg). `quoteAlways`
# selects escapeShellArg as it was before nixpkgs 24.11 (always quoted); since
# then it quotes only a string outside [[:alnum:],._+:@%/-]+.
{ quoteAlways ? false }:
let
  inherit (builtins) all isBool isInt isList isString match replaceStrings substring stringLength concatStringsSep attrNames;

  hasPrefix = prefix: text: substring 0 (stringLength prefix) text == prefix;

  quote = string: "'" + replaceStrings [ "'" ] [ "'\\''" ] string + "'";

  mkOptionType = { name, description ? name, check }: { inherit name description check; };
in
rec {
  inherit hasPrefix concatStringsSep;

  removePrefix = prefix: text:
    if hasPrefix prefix text
    then substring (stringLength prefix) (stringLength text - stringLength prefix) text
    else text;

  mapAttrsToList = function: attrs: map (name: function name attrs.${name}) (attrNames attrs);

  mkOption = attrs: attrs // { _type = "option"; };
  mkEnableOption = name: mkOption {
    type = types.bool;
    default = false;
    example = true;
    description = "Whether to enable ${name}.";
  };
  mkIf = condition: content: { _type = "if"; inherit condition content; };
  mkMerge = contents: { _type = "merge"; inherit contents; };
  literalExpression = text: { _type = "literalExpression"; inherit text; };

  hiPrio = package: package // { meta = (package.meta or { }) // { priority = -10; }; };

  optional = condition: value: if condition then [ value ] else [ ];
  optionals = condition: values: if condition then values else [ ];
  optionalAttrs = condition: attrs: if condition then attrs else { };
  concatMap = builtins.concatMap;
  optionalString = condition: text: if condition then text else "";

  escapeShellArg = arg:
    let string = toString arg; in
    if quoteAlways || match "[[:alnum:],._+:@%/-]+" string == null then quote string else string;
  escapeShellArgs = args: concatStringsSep " " (map escapeShellArg args);

  types = rec {
    bool = mkOptionType { name = "bool"; description = "boolean"; check = isBool; };
    # As in nixpkgs: a path literal is not a string, so it is rejected; "${./file}" is one, and passes.
    str = mkOptionType { name = "str"; description = "string"; check = isString; };
    int = mkOptionType { name = "int"; description = "signed integer"; check = isInt; };
    port = mkOptionType {
      name = "unsignedInt16";
      description = "16 bit unsigned integer; between 0 and 65535 (both inclusive)";
      check = v: isInt v && v >= 0 && v <= 65535;
    };
    ints.positive = mkOptionType {
      name = "positiveInt";
      description = "positive integer, meaning >0";
      check = v: isInt v && v > 0;
    };
    ints.unsigned = mkOptionType {
      name = "unsignedInt";
      description = "unsigned integer, meaning >=0";
      check = v: isInt v && v >= 0;
    };
    listOf = type: mkOptionType {
      name = "listOf";
      description = "list of ${type.description}";
      check = v: isList v && all type.check v;
    };
    # A derivation, or a string naming a top-level store path.
    package = mkOptionType {
      name = "package";
      check = v: (builtins.isAttrs v && (v.type or null) == "derivation")
        || (isString v && match "${builtins.storeDir}/[^/]+" v != null);
    };
    nullOr = type: mkOptionType {
      name = "nullOr";
      description = "null or ${type.description}";
      check = v: v == null || type.check v;
    };
  };
}
