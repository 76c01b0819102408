from dicomproxy.cli import main

raise SystemExit(main())
