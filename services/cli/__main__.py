from modelbus.services.cli import app

app(prog_name="modelbus")
