pub struct Anvil;
pub struct AnvilOptions;
