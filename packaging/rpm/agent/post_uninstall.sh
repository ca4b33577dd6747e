# gpuops-agent %postun: forget the removed units.
if [ -d /run/systemd/system ]; then
	systemctl daemon-reload || :
fi
